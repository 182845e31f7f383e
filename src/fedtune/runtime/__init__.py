"""Running fedtune's Flower apps as processes: `fedtune run` (the simulation engine under a
supervisor), a local deployment (SuperLink, SuperNodes, certificates, node workers) and Flower's
managed local SuperLink. The algorithm these processes run is `fedtune.federation`.

Public API:

- engine: the engine process of `fedtune run` (`python -m fedtune.runtime.engine`)
  - main: the process's entry point
- local: a federation on this machine with Flower's deployment engine
  - down: stops every process the federation recorded
  - flower_env: the environment Flower's processes need
  - up: starts a SuperLink and SuperNodes; the recorded state
- local_cli: `fedtune federation up|down|status|restart|stop-local|worker`
  - register: adds the `federation` commands to the `fedtune` parser
- run_cli: `fedtune run`
  - register: adds the `run` command to the `fedtune` parser
"""

__all__: list[str] = ["engine", "local", "local_cli", "run_cli"]
