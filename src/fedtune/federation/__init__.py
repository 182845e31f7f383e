"""The federated algorithm as a Flower app: the ServerApp and the ClientApp, one round as named
steps, strategies by name (FedAvg and its variants, SCAFFOLD, FlexLoRA), client-level differential
privacy and the checks on client updates. Running these apps as processes is `fedtune.runtime`.

Public API:

- client_app: the ClientApp, one client's local instruction tuning per round
  - app: the Flower ClientApp (`fedtune.federation.client_app:app`)
  - MODEL_LOADS: how many base models this process has loaded
  - describe_node: answers which partition this node holds
  - get_partition: this client's tokenized examples, built once per data setup
  - get_worker: the cached model, tokenizer and partitions of a model setup
  - local_train: trains the received global adapter for one round and replies
- privacy: client-level differential privacy, DP-FedAvg with fixed clipping
  - privacy_spent: the (ε, δ) a run has spent after its releases
- progress: live progress of a federated run, one line per round
  - stderr_emit: writes a progress line to stderr
- server_app: the ServerApp, a recipe over the round's named steps
  - app: the Flower ServerApp (`fedtune.federation.server_app:app`)
  - make_server_app: a ServerApp bound to a resolved config and run directory
  - open_run: a new run directory, or the existing one checked for resuming
  - preflight: checks the model and data sources before anything is written
- strategies: aggregation strategies, one module each, registered by name
  - STRATEGIES: the registry `strategy.name` selects from
  - Strategy: what a strategy is (its settings, how it is built, what it checks)
  - build_strategy: the configured Flower strategy
  - get_strategy: the registered strategy of a name
  - register_strategy: makes a strategy selectable
  - restore_strategy_state: puts back a strategy's saved state
  - strategies: every registered strategy
  - strategy_state: a strategy's state between rounds, as tensors
- worker_link: the ClientApp's side of a node worker, and its wire format
  - WorkerError: the node's worker could not be reached, or failed the message
  - receive: reads one frame from the socket
  - send: writes frames to the socket
"""

__all__: list[str] = [
    "client_app",
    "privacy",
    "progress",
    "server_app",
    "strategies",
    "worker_link",
]
