"""Training on Lightning, in four rooms over one configuration (`config.py`, the `RunConfig` a recipe fills):

- `resilience/`: preemption signals, dead-rank detection, non-finite losses and gradients, and the hook points
  plug-ins fill (fault drills);
- `zero/`: the DeepSpeed ZeRO strategy, its sparse backend and the partitioned (ZeRO-3) start-up;
- `loop/`: what Lightning runs: the LightningModule, the data module and the callbacks (checkpoints, DST,
  evaluation, adapters);
- `assembly/`: a run put together and started: `build` (Trainer, data, module), `run.fit`, the run summary.

resilience/, zero/ and config.py import no other room; loop/ uses those three, assembly/ all of them
(docs/architecture.md's layer table, enforced by the architecture test).
"""
