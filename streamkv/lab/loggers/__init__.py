"""Experiment loggers for the ``logger`` config group."""
