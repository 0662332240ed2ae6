"""The commands on top: the ``robustmatrix`` CLI and what only it calls — ``check``, the defense
scaffold and the nightly report. Nothing imports this layer."""
