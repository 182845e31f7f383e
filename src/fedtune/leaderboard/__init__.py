"""The fedtune leaderboard: submissions built from run directories, their validation and
spot-check verification, the SQLite store, the ranking beside the published FlowerTune board, the
web app and API, and `fedtune leaderboard ...`.

Public API:

- cli: `fedtune leaderboard`: submit, show, serve, verify and the operator's commands
  - register: adds the `leaderboard` commands to the `fedtune` parser
- runs: from a run directory to a submission
  - build_submission: collects and cross-checks a run directory into a submission
- store: the leaderboard's SQLite storage
  - Store: a leaderboard database file, created and migrated on first use
"""

__all__: list[str] = ["cli", "runs", "store"]
