"""Batch generation: input pictures in, ``k`` variations of each out as PNG files; deterministic and resumable.

What ``run_generate`` writes under ``OUT``:

- ``OUT/<name>/<j>.png``: variation ``j`` of an input, where ``<name>`` is the input's file stem
  made safe (``safe_name``: one plain folder name, never ``.``/``..``, hidden, or holding separators
  or control characters). Inputs whose names collide (compared case-insensitively, so case-insensitive file systems are
  safe too) are named ``<stem>-<8 hex digits>``, the digits starting the sha256 of the input's
  absolute path. Each PNG carries text chunks with the settings, its picture index and the
  input's sha256 (and nothing time-dependent: the same command gives the same bytes).
- ``OUT/<name>/grid.png`` with ``grid=True``: the input squashed to the output size, then its
  variations, in one row (a near-square grid beyond 8 tiles).
- ``OUT/manifest.jsonl``: one JSON object per variation (``path`` relative to OUT, ``input``
  relative to the working directory when inside it, ``input_sha256``, ``index``, ``input_index``,
  ``variation``, the settings, ``nsfw``), appended as each PNG lands; at the end of a run (also
  one that stops early) it is rewritten sorted, exactly one line per variation file present.

Picture numbering: inputs are sorted by absolute path; input ``i`` owns pictures ``i*k .. i*k+k-1``
and picture ``n`` draws its noise from ``fold_in(key(seed), n)``. Inputs that fail keep their
number, so a bad file never changes anyone else's pictures. Every file is written to a temporary
name in its folder and renamed into place (a killed run's temporary files are removed by the next
run); a re-run skips outputs that decode completely and whose text chunks match the current
settings and input, and regenerates exactly the rest. An output folder holding outputs made with
other settings is refused unless ``start_over``; a file at an output path that imvar-jax did not
write is never replaced (that input fails); every write is checked to stay inside ``OUT``. A run
holds a lock on ``OUT`` (``flock`` on the folder), so two runs never write into one folder.

The settings in the text chunks and manifest records are those of ``GenerationSettings``
(``imvar_jax.settings``), written and read back there.

An input named ``*.npy`` is a CLIP image embedding (``[D]`` or ``[1, D]``), varied like a picture.
``negative``: a picture or embedding whose embedding every input's unconditional half uses; its
sha256 is in every output (``negative_sha256``) and compared like a setting. ``run_mix`` and
``run_interpolate`` (``creative``) make one conditioning of several sources, into ``OUT/mix/``
and ``OUT/interpolation/`` (so no input's folder takes those names).

Modules: ``inputs`` (discovery, naming, reading and decoding), ``outputs`` (atomic writes, PNG
text, manifest, contact sheets, animations), ``runner`` (the run) and ``creative`` (mixes and
interpolations).
"""

from ..settings import SettingsError
from .creative import run_interpolate, run_mix
from .inputs import (GRID, IMAGE_EXTENSIONS, MANIFEST, InputError, InputFile, SourceError, collect_inputs, decode_image,
                     printable, safe_name)
from .outputs import OutputError, contact_sheet
from .runner import RunSummary, run_generate

__all__ = [
    "GRID",
    "IMAGE_EXTENSIONS",
    "MANIFEST",
    "OutputError",
    "InputError",
    "InputFile",
    "RunSummary",
    "SettingsError",
    "SourceError",
    "collect_inputs",
    "contact_sheet",
    "decode_image",
    "printable",
    "run_generate",
    "run_interpolate",
    "run_mix",
    "safe_name",
]
