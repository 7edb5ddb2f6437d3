"""`pipeweaver profile`: microbenchmarks of this machine, fitted into SEMU's calibration.

torch is imported by the modules here (not by this package's import, so the CLI can
register the command without loading torch); the planning side (semu) only reads the
JSON file this writes.
"""
