"""After a run: evaluation, text metrics, reports, the sweep leaderboard and merged export."""
