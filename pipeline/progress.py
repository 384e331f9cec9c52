"""How long library functions report progress without knowing who listens (a Luigi task, a bar, a test)."""
from __future__ import annotations

from typing import Callable, Optional

# Progress is reported, never read back: it cannot change a result (see pipeline.fingerprint).
AFFECTS_RESULTS = False

# progress(done, total, unit, detail): `total` is None while unknown; `unit` names what `done`
# counts ("bytes", "images", "steps", "batches"); `detail` is a short note such as the last loss.
Progress = Callable[[int, Optional[int], str, str], None]
