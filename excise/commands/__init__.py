"""Sub-commands of the ``excise`` CLI, one typer app per group (``train``, ``eval``, ``data``).

Each module keeps its heavy imports inside the command functions, so ``excise --help``
starts small; :mod:`excise.cli` mounts the apps.
"""
