"""``python -m pipeweaver_megatron.cpu_standin SCRIPT ARGS...``: run SCRIPT on the stand-in.

The script runs exactly as ``python SCRIPT ARGS`` would: its folder first on sys.path
(so Megatron-LM's own ``megatron`` package and sibling modules such as pretrain_gpt are the
ones imported), ``sys.argv == [SCRIPT, *ARGS]`` and ``__name__ == "__main__"``. Under
torchrun the rendezvous variables come from torchrun; on a plain ``python -m`` they default
to a world of one process.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m pipeweaver_megatron.cpu_standin SCRIPT [ARGS...]"

# A world of one process when torchrun did not start us.
SINGLE_PROCESS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                  "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def single_process_defaults() -> None:
    """Fill in torch.distributed's env:// variables that torchrun would have set."""
    for key, value in SINGLE_PROCESS.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = _free_port()


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` with arguments ``argv[1:]`` on the stand-in; 2 for a usage error."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = Path(argv[0])
    if not script.is_file():
        print(f"cpu_standin: no such script: {argv[0]}", file=sys.stderr)
        return 2
    single_process_defaults()
    sys.argv = list(argv)  # the script path exactly as given, like `python SCRIPT`
    # `python SCRIPT` puts the script's folder where `python -m` put the working directory.
    sys.path[0] = str(script.resolve().parent)

    from . import install

    mode = install()
    with mode:
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
