"""Training CT-FM: self-supervised pretraining and fine-tuning.

- :mod:`.config`: ``load_config`` (JSON/YAML deep-merged onto per-task defaults, unknown keys rejected).
- :mod:`.trainer`: ``train(task, out_dir)``, the loop shared by every task: AdamW, warmup + cosine
  schedule, DDP under ``torchrun``, mixed precision on CUDA, atomic checkpoints, exact resume,
  metrics CSV / TensorBoard, graceful SIGTERM/SIGINT, export of the usable model at the end.
- :mod:`.runfolder`: which output folders a run may write into (new, empty, or a run of the same task,
  marked by ``ctfm-run.json``).
- :mod:`.schedule`: the learning-rate schedule. :mod:`.distributed`: process groups and a CPU SyncBatchNorm.

Submodules are imported explicitly (``from CTFMLib.train.trainer import train``) so that importing the
package costs nothing.
"""
