"""Models on disk: training checkpoints (`files`, `save`, `resume`, `read`), one consolidated file (`consolidate`),
HF ImageGPT folders (`hf`), and one loader for every form (`load`); `weights` checks a state dict against a config."""
