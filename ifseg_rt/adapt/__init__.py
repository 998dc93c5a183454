"""Image-free adaptation of OFA to a category list (ifseg.md §5, §9-§10): word grids, trainer, run directory, CLI.

    from ifseg_rt.adapt import AdaptOptions, WordGridTrainer, prepare

    setup = prepare("ofa_base.pt", "ofa-bpe", "sky, road, tree")   # OFA -> SegOFA, categories set
    trainer = WordGridTrainer(setup.model, AdaptOptions(steps=2000))
    while not trainer.done:
        stats = trainer.train_step()

or from the shell: ``python -m ifseg_rt adapt --help``.
"""

from .grids import WordGridBatch, WordGridSampler, nearest_indices, nearest_resize
from .options import AdaptOptions
from .run import RunSetup, RunWriter, Validation, prepare, train
from .trainer import (FROZEN_PREFIXES, StepStats, WordGridTrainer, cosine_lr, freeze, is_frozen, split_parameters,
                      training_model, word_grid_loss)

__all__ = ["AdaptOptions", "WordGridBatch", "WordGridSampler", "nearest_indices", "nearest_resize", "RunSetup",
           "RunWriter", "Validation", "prepare", "train", "FROZEN_PREFIXES", "StepStats", "WordGridTrainer",
           "cosine_lr", "freeze", "is_frozen", "split_parameters", "training_model", "word_grid_loss"]
