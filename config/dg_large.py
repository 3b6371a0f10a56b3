# The downstream DG protocol: the continued-pre-trained backbone frozen, the head trained on one source
# domain (the paper: 40k iterations, batch 2, lr 1e-4), model selection on held-out source tiles.
#   python train.py config/dg_large.py --data=data/<source> --out_dir=out/dg_<source>
out_dir = "out/dg_large"
data = "data/fusar_map"
phase = "dg"
init = "ckpt:out/cpt_large/ckpt.pt"
preset = "large"
batch_size = 2
max_iters = 40000
learning_rate = 1e-4
min_lr = 1e-6
warmup_iters = 500
schedule = "poly"
log_interval = 50
eval_interval = 4000
ckpt_interval = 4000
csv_log = "out/dg_large/log.csv"
