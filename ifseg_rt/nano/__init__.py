"""The embedded default: a nano OFA-architecture model and the procedurally generated world it lives in.

* :mod:`~ifseg_rt.world` - the synthetic world: textured stuff regions and coloured things, exact label maps
  (for evaluation only), box annotations; numpy + Pillow, deterministic per seed;
* :mod:`~ifseg_rt.nano.tasks` - the nano model's vocabulary, configuration and OFA-style pretraining tasks;
* :mod:`~ifseg_rt.nano.pretrain` - ``python -m ifseg_rt.pretrain_nano``: pretraining from scratch (no label maps);
* :mod:`~ifseg_rt.nano.demo` - ``python -m ifseg_rt demo``: IFSeg end to end on it.

The shipped weights live in ``export/nano/`` (a wheel carries them as ``ifseg_rt/_nano``).
"""
