"""Benchmark sweeps: models x tasks x methods x step counts x images x seeds, resumable and multi-process.

A sweep (configured by a TOML file, see :mod:`hessdiff.eval.sweep.config`) is a fixed, ordered list of
*items*. A sample item is one image produced by one configuration (model, task, method, step count)
for one clean image (restoration sweeps) and one seed; a reference item is the feature vector of one
reference image (for FID / KID). :func:`run_sweep` computes the items that are not done yet and then
rebuilds the summaries from everything on disk.

Output folder (``out``)::

    sweep.json                     resolved configuration, data digests and the sweep hash
    items/<model>/<task>/<method>/steps-<k>/<image-id>_s<seed>.png    the image (seed<seed>.png when generating)
                                   ... .json   per-item result (the record of completion)
                                   ... .npy    per-item features (when FID/KID are computed)
    reference/<model>/<image-id>.npy / .json   reference features
    results.jsonl                  one line per finished sample item, in item order
    summary.csv / summary.md / summary.json    per-configuration mean ± sd, FID / KID, NFE, time
    plots/<metric>.png             each metric against NFE, one line per method (per model and task)
    pictures/<model>/<task>.png    the first 4 images: clean | measurement | each method and step count

Determinism
-----------
* Image ``i`` of the data set has seed ``s_i = base_seed + i``; its measurement (mask / kernel /
  noise) is drawn from ``s_i`` only, so every method, step count and seed sees the same ``y``.
* The method's generator of item (image ``i``, seed ``s``) is seeded with :func:`sampler_seed` of
  ``(s_i, s)`` (with ``s`` itself when generating without data).
* Items are grouped into batches of ``batch_size`` items of one configuration in the fixed item
  order; a batch is always computed whole (also when some of its items are already done, which are
  then not rewritten). Results therefore do not depend on the order of work, on interruptions or on
  the number of processes; with ``batch_size = 1`` no two images ever share a computation.

Crash safety
------------
Every file is written to a temporary file in the same folder, flushed with ``fsync`` and renamed into
place (``os.replace``), and the folder is synced. An item's ``.json`` is written last and is the
only record of completion: an item counts as done when its ``.json`` parses, belongs to this sweep
and its image / features files exist. A kill at any moment therefore leaves finished items intact
and unfinished ones absent; a restart (``resume=True``) computes exactly the missing items. The
summaries are rebuilt from the per-item files, never appended to. Leftover temporary files of a
killed run are removed at the next start. The folder is locked (``fcntl.flock``) while a sweep runs
in it, and a folder holding another configuration's results is refused (:class:`SweepMismatchError`)
unless ``resume=True``: then the sweep is *extended*. Each item record carries the identity of its
result (``reuse``: model weights, task, method options, step count, image content and seed, the
outputs asked for -- not the batch size, the seed list or the other images), and a finished item with
the same identity is reused; so adding a method, a step count, a seed, a task or images computes only
the new items. Items of configurations no longer listed stay on disk but leave the summaries.

Several processes
-----------------
Under ``torchrun --nproc_per_node N`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the
environment) the process group is initialised with ``gloo`` on CPU and ``nccl`` on CUDA (each rank
on ``cuda:LOCAL_RANK``). Rank 0 checks the folder, finds the pending batches and broadcasts them;
rank ``r`` computes pending batches ``r, r + N, ...``. The output folder must be on a file system
shared by all ranks (checked at start). Rank 0 then waits until every other rank's items are on disk
(``dist_timeout`` minutes without a new item stops it with an error naming the ranks: a frozen rank
does not block the others for long), reads every item's features and computes FID / KID once from
all of them, in item order, so the numbers equal those of a single process (never an average of
per-rank FIDs).

Modules
-------
* :mod:`~hessdiff.eval.sweep.config` -- the TOML schema, validation, resolution and hashing;
* :mod:`~hessdiff.eval.sweep.methods` -- the methods and feature extractors a sweep can name;
* :mod:`~hessdiff.eval.sweep.run` -- :func:`run_sweep` (the batches, one process or several);
* :mod:`~hessdiff.eval.sweep.work` -- the fixed item order and batches;
* :mod:`~hessdiff.eval.sweep.images` -- clean image sets, model / metric image spaces, per-item seeds;
* :mod:`~hessdiff.eval.sweep.store` -- the output folder: atomic files, item records, lock;
* :mod:`~hessdiff.eval.sweep.processes` -- ``torchrun`` process groups;
* :mod:`~hessdiff.eval.sweep.summary` -- ``results.jsonl``, summary tables and plots;
* :mod:`~hessdiff.eval.sweep.evaluate` -- folder-to-folder metrics (``hessdiff eval``).
"""

from hessdiff.eval.sweep.config import SweepConfig, SweepConfigError, load_config, parse_config
from hessdiff.eval.sweep.evaluate import EVAL_METRICS, evaluate_folders
from hessdiff.eval.sweep.images import sampler_seed
from hessdiff.eval.sweep.run import SweepReport, run_sweep
from hessdiff.eval.sweep.store import SweepError, SweepMismatchError
from hessdiff.eval.sweep.summary import load_results, strip_run_fields

__all__ = [
    "EVAL_METRICS",
    "SweepConfig",
    "SweepConfigError",
    "SweepError",
    "SweepMismatchError",
    "SweepReport",
    "evaluate_folders",
    "load_config",
    "load_results",
    "parse_config",
    "run_sweep",
    "sampler_seed",
    "strip_run_fields",
]
