"""One client's local training for one round, in plain PyTorch: the FlowerTune template's SFT
step with less padding, the challenge's learning-rate schedule, and the held-out loss.

Public API:

- local: the local SFT loop of one client for one round
  - collate: right-padded input ids, attention mask and label positions
  - cosine_annealing: the challenge's per-round learning rate
  - draw_examples: indices of a seeded draw of examples
  - evaluate_loss: mean cross-entropy over the response tokens of examples
  - micro_batches: groups examples by length within a token budget
  - summed_token_loss: summed cross-entropy over response tokens, and their count
  - train_local: runs one round's AdamW steps
"""

__all__: list[str] = ["local"]
