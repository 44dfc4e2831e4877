"""The shared low-level pieces every other package may use: errors, device, progress, reports, tensor reductions."""
