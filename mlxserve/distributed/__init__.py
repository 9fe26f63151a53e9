"""Serving one model sharded over several machines with ``mx.distributed`` (docs/DISTRIBUTED.md).

``group.py`` starts or joins the group from mlx's hostfile; ``collectives.py`` carries rank
0's decisions over mlx's collectives; ``runner.py`` is the rank-0 runner and the follower;
``mlxserve/server/distributed.py`` wires them into the daemon.
"""
