"""What every training stage needs around its loop, one module per purpose.

seeding      seeds and the data order of each epoch (a function of (seed, epoch): exact resume)
io           atomic file and directory writes (a reader never sees half a file)
run_dir      run directories, and removing the ones a failed launch created
metrics_log  metrics.jsonl, TensorBoard and W&B logging
progress     the live progress bar with ETA
checkpoint   resumable checkpoints (model, optimizer, scheduler, RNG states)
health       guards that stop training on NaN/inf
"""
