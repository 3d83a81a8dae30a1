"""Task modules: data generation, text encoding and scoring for fine-tuning and evaluating DiffusionGemma models.

- `dgemma.tasks.sudoku`: 9x9 Sudoku as an 81-digit canvas (generator, exact solver, validator, JSONL writer).

Submodules are imported on use (``from dgemma.tasks import sudoku``), so ``python -m dgemma.tasks.sudoku`` runs cleanly.
"""
