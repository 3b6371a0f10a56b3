# The embedded default (README main job): the tiny preset trained end to end on one source domain of the
# synthetic suite, a few minutes on 2 CPU cores. python train.py config/synth_tiny.py
out_dir = "out/synth_tiny"
data = "data/synth/N-G3-HH-db"
phase = "cpt"
preset = "tiny"
batch_size = 16
max_iters = 300
learning_rate = 2e-3
warmup_iters = 20
log_interval = 25
eval_interval = 100
ckpt_interval = 100
csv_log = "out/synth_tiny/log.csv"
