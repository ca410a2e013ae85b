"""Files: atomic outputs (``outputs``), checkpoints and resume (``checkpoint``), and the
update of a finished output with appended rows (``update``)."""
