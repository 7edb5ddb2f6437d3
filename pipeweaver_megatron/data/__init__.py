"""Real multimodal data on disk: source folders -> Energon datasets, read back as samples.

records (samples.jsonl checked), prepare (WebDataset shards + Energon's prepare),
reader (Energon -> DataSample, with loader state), loader (a training loader: packed
global batches per data-parallel rank, resumable at the first untrained sample), stats
(dynamicity under a model's rules), tokenizer (byte-level and a local BPE), demo (a
small real dataset made from package-shipped photographs and text). Importing this
package loads neither torch nor Energon; `reader`, `loader`, `stats` and `prepare`'s
Energon step do.
"""

from .errors import DataError

__all__ = ["DataError"]
