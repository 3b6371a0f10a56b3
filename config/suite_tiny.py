# One source of the synthetic DG suite, for the end-to-end comparison in the README (physics router vs
# token-only router vs dense ViT): the tiny preset trained end to end on data/synth/<source>.
#   python train.py config/suite_tiny.py --data=data/synth/<source> --out_dir=out/suite/<variant>/<source>
phase = "cpt"
preset = "tiny"
batch_size = 16
max_iters = 120
learning_rate = 2e-3
warmup_iters = 10
log_interval = 40
eval_interval = 0
ckpt_interval = 0
