"""``python -m ifseg_rt.pretrain_nano``: the command of :mod:`ifseg_rt.nano.pretrain`, kept at its documented name."""

from .nano.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
