"""What a trained model is worth: samples (`sample`), features (`features`), linear probes (`linear`, `labels`,
`probe`), fine-tuning (`finetune`), the paper's full report (`report`), and the commands that run them (`commands`)."""
