"""Diagnostics: is the model under- or over-fitting, and what should change?

Every diagnostic trains fresh models of the recipe's architecture on parts of the training
data (learning curves, bootstrap rounds) or at other settings (validation curves): one at a
time with `engine.train.fit_fresh`, many at once with `engine.ensemble.fit_members`, which
trains them as a batched ensemble where they share an architecture. The preprocessing
fitted on the whole training part is reused, so the curves compare models, not scalers.
The parts: `curves` (learning and validation curves, Rademacher complexity),
`bias_variance` (the bootstrap decomposition), `landscape` (the loss around the trained
weights), `verdict` (what the figures say), and `run` (all that a recipe asks for).
"""
