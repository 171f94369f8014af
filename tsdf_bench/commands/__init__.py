"""One module per ``tsdf-bench`` sub-command."""
