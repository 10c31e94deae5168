"""A Hydra sweeper on Optuna's ask/tell API (``hydra/sweeper=streamkv_optuna``).

Why our own: the released ``hydra-optuna-sweeper`` (1.3.0) pins ``optuna<3``, which cannot be
installed beside Optuna 4/5. Hydra finds this package through the ``hydra_plugins`` namespace.
"""
