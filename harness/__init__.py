"""What experiment scripts share, with no agent in it.

- :mod:`harness.statistics`: intervals for comparing policies (paired bootstrap over
  windows, IQM with a stratified bootstrap over seeds);
- :mod:`harness.runs`: argument checks, run folders (:class:`~harness.runs.RunFolder`:
  ``config.json``, overwrite / resume), incremental row logs (:class:`~harness.runs.RowLog`),
  the script entry :func:`~harness.runs.run_main` and the trial executors;
- :mod:`harness.reporting`: table writers and plots (summaries over windows and seeds,
  Markdown tables, Pareto fronts).

Import the submodules themselves; this package imports nothing, so loading one of them
does not load the others.
"""
