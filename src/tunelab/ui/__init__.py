"""``tunelab ui``: the whole workflow -- model and data, plan, train, compare, chat -- in a
local web page. See :mod:`tunelab.ui.app` for the API and :mod:`tunelab.ui.jobs` for how
runs are kept as background processes and folders."""
