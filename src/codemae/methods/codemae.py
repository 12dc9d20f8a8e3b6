"""CoDe-MAE: the joint MAE plus OKD, CCL and CDR (SPEC section 1).

All three act on the decoder-embedded visible tokens of the joint MAE:
- OKD distils a frozen teacher's (parameter-free layer-normed) patch features onto
  the visible optical tokens: a main branch from the decoder-embedded tokens and
  an auxiliary branch from the encoder at 3/4 depth through two extra blocks.
- CCL conditions each modality on the other with a residual cross-attention
  (no MLP, no output norm), mean-pools, and applies a symmetric InfoNCE with
  negatives from all processes. The ablation spaces (vanilla, linear, MLP) pool
  the raw tokens instead.
- CDR reconstructs a degraded optical target (grayscale by default) from the SAR
  tokens with its own decoder (and, ``both``, the SAR channel mean from optical).
On unpaired batches CCL and CDR are computed and multiplied by 0, so every
parameter still receives a gradient and distributed training stays in step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from codemae.batch import Batch
from codemae.config import MethodConfig
from codemae.errors import ConfigError
from codemae.losses import patch_errors, pooled_mean, symmetric_info_nce
from codemae.methods.ccl_heads import CCL_HEADS
from codemae.methods.cdr_targets import CDR_TARGETS, as_rgb
from codemae.methods.mae import JointMAE, Visible
from codemae.models.attention import Block, layer_norm
from codemae.models.backbone import Encoder, gather_tokens
from codemae.models.teacher import Teacher, to_student_grid


class CoDeMAE(JointMAE):
    def __init__(self, encoder: Encoder, cfg: MethodConfig) -> None:
        super().__init__(encoder, cfg)
        dim, heads = cfg.decoder_dim, cfg.decoder_heads
        self._teacher: list[Teacher] = []  # a list keeps the frozen teacher out of the state dict
        self.aux_block = -1
        if cfg.okd:
            depth = encoder.num_attention_blocks
            self.aux_block = cfg.okd_aux_block if cfg.okd_aux_block is not None else int(0.75 * depth)
            if not 0 <= self.aux_block < depth:
                raise ConfigError(f"config key 'method.okd_aux_block': {self.aux_block} is not a block of 0..{depth - 1}")
            width = encoder.embed_dim
            self.okd_main = nn.Sequential(layer_norm(dim), nn.Linear(dim, cfg.teacher.dim))
            self.okd_aux = nn.Sequential(
                *(Block(width, encoder.num_heads) for _ in range(cfg.okd_aux_depth)),
                layer_norm(width), nn.Linear(width, cfg.teacher.dim),
            )
        if cfg.ccl != "none":
            width = dim if cfg.ccl_input == "decoder" else encoder.embed_dim
            self.ccl_heads = CCL_HEADS[cfg.ccl](width, heads)
        if cfg.cdr:
            self.cdr_target = CDR_TARGETS[cfg.cdr_target]
            p = encoder.patch_size
            outputs = {"sar": self.cdr_target.length(p)}
            if cfg.cdr_direction == "both":  # the same target of the SAR image, through the same head
                outputs["opt"] = self.cdr_target.length(p)
            self.cdr_decoder = self.masked_decoder(outputs, cfg.cdr_depth)

    @property
    def uses_teacher(self) -> bool:
        return self.cfg.okd

    def attach_teacher(self, teacher: Teacher | None) -> None:
        """Use ``teacher`` for OKD targets of batches that carry no cached features."""
        self._teacher = [teacher] if teacher is not None else []

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        images = self.images(batch)
        visible = self.embed_visible(images, (self.aux_block,) if self.cfg.okd else ())
        w = self.cfg.weights
        terms = {"recon": w.recon * self.reconstruction(images, visible)}
        both = "opt" in images and "sar" in images
        paired = 1.0 if batch.get("paired") else 0.0
        if self.cfg.okd and "opt" in images:
            terms["okd"] = w.okd * self.distillation(batch, visible["opt"])
        if self.cfg.ccl != "none" and both:
            terms["ccl"] = w.ccl * paired * self.contrastive(visible)
        if self.cfg.cdr and both:
            terms["cdr"] = w.cdr * paired * self.degraded_reconstruction(batch, visible)
        return terms

    def distillation(self, batch: Batch, opt: Visible) -> Tensor:
        """SmoothL1 of both student branches against LN(teacher patch tokens) at visible positions."""
        grid = self.encoder.grid
        target = batch.get("teacher_opt")
        if target is None:
            if not self._teacher:
                raise ConfigError("method.okd is on but there is no teacher: set method.teacher.kind and path, "
                                  "or method.teacher.cache")
            target = to_student_grid(self._teacher[0](unit_image(batch, "opt")), grid)
        target = gather_tokens(F.layer_norm(target.float(), target.shape[-1:]), opt.mask.ids_keep)
        main = F.smooth_l1_loss(self.okd_main(opt.tokens), target, beta=1.0)
        aux = F.smooth_l1_loss(self.okd_aux(opt.hidden[self.aux_block]), target, beta=1.0)
        return main + aux

    def contrastive(self, visible: dict[str, Visible]) -> Tensor:
        """Symmetric InfoNCE between the pooled optical and SAR embeddings of each pair, taken from
        the decoder-embedded tokens (CoDe-MAE) or the raw encoder tokens (rigid-alignment baselines)."""
        if self.cfg.ccl_input == "decoder":
            opt, sar = visible["opt"].tokens, visible["sar"].tokens
        else:
            opt, sar = visible["opt"].features, visible["sar"].features
        a, b = self.ccl_heads(opt, sar)
        return symmetric_info_nce(a, b, self.cfg.ccl_temperature, self.cfg.ccl_gradient)

    def degraded_reconstruction(self, batch: Batch, visible: dict[str, Visible]) -> Tensor:
        """Norm-pix MSE on masked patches of the optical image's degraded target predicted from the SAR
        tokens (plus, ``both``, the SAR image's from the optical tokens), pooled over both directions
        (the decoder predicts the masked patches only)."""
        p = self.encoder.patch_size
        inputs = {m: (visible[m].tokens, visible[m].mask.ids_restore) for m in self.cdr_decoder.outputs}
        masked = {m: visible[m].mask.ids_masked for m in inputs}
        preds = self.cdr_decoder(inputs, masked)
        source = {"sar": "opt", "opt": "sar"}  # the tokens of one modality predict the other's target
        errors = []
        for m, pred in preds.items():
            image = unit_image(batch, source[m]) if self.cdr_target.unit else batch[source[m]]
            target = gather_tokens(self.cdr_target.compute(as_rgb(image), p), masked[m])
            errors.append(patch_errors(pred, target, self.cfg.norm_pix_loss))
        return pooled_mean(errors)

    def cross_reconstructions(self, images: dict[str, Tensor], visible: dict[str, Visible]) -> dict[str, Tensor]:
        """``cdr_recon``: the degraded optical target predicted from the SAR tokens (pixel targets only)."""
        if not (self.cfg.cdr and self.cdr_target.pictured and "sar" in images and "opt" in images):
            return {}
        pred = self.cdr_decoder({"sar": (visible["sar"].tokens, visible["sar"].mask.ids_restore)})["sar"]
        target = self.cdr_target.image(as_rgb(images["opt"]), self.encoder.patch_size)
        return {"cdr_recon": self.paste(pred, target, visible["sar"].mask.mask, self.cfg.norm_pix_loss)}


def unit_image(batch: Batch, modality: str) -> Tensor:
    """A modality's images back in [0, 1], undoing the normalisation the batch records."""
    if f"{modality}_mean" not in batch:
        raise ValueError(f"this target needs the [0, 1] images: the batch carries no {modality}_mean / {modality}_std")
    return batch[modality] * batch[f"{modality}_std"][:, :, None, None] + batch[f"{modality}_mean"][:, :, None, None]
