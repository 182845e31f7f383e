"""Leaderboard tests: store, validation, ranking, API, browser, load, submit."""
