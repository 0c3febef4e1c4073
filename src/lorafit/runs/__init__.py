"""Around a run: checkpoint resolution and writing, resume, callbacks, trackers, strategies."""
