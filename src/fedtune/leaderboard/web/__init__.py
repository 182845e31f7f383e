"""The leaderboard's web app: server-rendered pages, SVG charts, a small script for sorting."""
