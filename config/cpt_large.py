# Continued pre-training of the large preset (1.3B total, 0.3B active), as in the paper: upcycled from
# a local DINOv2 ViT-L/14 file, backbone + head trained on a mix of prepared datasets in the 7-class
# taxonomy (prepare.py <dataset> --root ... --out data/<name>). 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/cpt_large.py
out_dir = "out/cpt_large"
data = "data/openearthmap_sar,data/whu_opt_sar,data/fusar_map"
phase = "cpt"
init = "dinov2:checkpoints/dinov2_vitl14_pretrain.pth"
preset = "large"
batch_size = 4            # per GPU: 4 x 8 GPUs = 32 tiles of 512x512 per step
max_iters = 100000
learning_rate = 3e-5      # the paper's CPT learning rate
min_lr = 3e-7
warmup_iters = 1000
schedule = "poly"
weight_decay = 0.05
log_interval = 50
eval_interval = 2000
ckpt_interval = 2000
csv_log = "out/cpt_large/log.csv"
