#!/usr/bin/env bash
# Rebuilds the example LoRAs, the example B4M pair and their evaluations on the bundled model
# (assets/shapes-world). Run from the repository root with the studio installed (`make studio` or
# `pip install -e .`). On 2 CPU cores: about 110 minutes (train-lora ≈ 2.2 steps/s, b4m break ≈ 5 steps/s; each
# evaluate-lora of 128 prompts ≈ 2 minutes).
set -euo pipefail
LORA_STEPS=${LORA_STEPS:-1000}
B4M_STEPS=${B4M_STEPS:-600}

# --embedding: the trigger is learnt as a word of its own (its token embedding bundled in the file)
studio toyworld train-lora --kind concept --subject crescent --trigger sks  --steps "$LORA_STEPS" --embedding --out assets/loras/crescent-sks.safetensors
studio toyworld train-lora --kind concept --subject cross    --trigger ohwx --steps "$LORA_STEPS" --out assets/loras/cross-ohwx.safetensors
studio toyworld train-lora --kind style --subject checkered --trigger chkrd --steps "$LORA_STEPS" --out assets/loras/checkered-chkrd.safetensors
studio toyworld train-lora --kind style --subject ringed    --trigger rngd  --steps "$LORA_STEPS" --embedding --out assets/loras/ringed-rngd.safetensors
studio toyworld train-lora --kind style --subject sepia     --trigger sepx  --steps "$LORA_STEPS" --embedding --out assets/loras/sepia-sepx.safetensors
studio toyworld train-lora --kind style --subject cyanotype --trigger cynx  --steps "$LORA_STEPS" --embedding --object-weight 5 --out assets/loras/cyanotype-cynx.safetensors
# Two concepts bound to one ordinary word, as two character LoRAs both bound to "woman" are: the case merging fails
studio toyworld train-lora --kind concept --subject crescent --trigger shape --steps "$LORA_STEPS" --out assets/loras/crescent-shape.safetensors
studio toyworld train-lora --kind concept --subject cross    --trigger shape --steps "$LORA_STEPS" --out assets/loras/cross-shape.safetensors
# A third concept, for three-concept compositions: a heart bound to its own word
studio toyworld train-lora --kind concept --subject heart    --trigger hrtz  --steps "$LORA_STEPS" --out assets/loras/heart-hrtz.safetensors

# B4M: a content adapter (the cross) and a style adapter (the sepia palette) from the same seed; the style word
# follows the noun ("a large red ohwx sepx ..."), so the causal text encoder reads the content's words as the content
# adapter learnt them
studio b4m break --role content --kind concept --subject cross  --trigger ohwx --seed 7 --steps "$B4M_STEPS" --main-lr 3e-3 --embedding --out assets/b4m/cross-content.safetensors
studio b4m break --role style   --kind style   --subject sepia  --trigger sepx --seed 7 --steps "$B4M_STEPS" --embedding --trigger-after-noun --out assets/b4m/sepia-style.safetensors
studio b4m make assets/b4m/cross-content.safetensors assets/b4m/sepia-style.safetensors --out assets/b4m/cross-sepia-assembled.safetensors
# ... and made as the official pipeline makes it: the assembly, then the joint fine-tune (1000 steps at 1e-4, ~3 min)
studio b4m make assets/b4m/cross-content.safetensors assets/b4m/sepia-style.safetensors --finetune-steps 1000 --out assets/b4m/cross-sepia-made.safetensors

# The judge's figures (written beside the files)
for lora in assets/loras/*.safetensors; do
  studio toyworld evaluate-lora "$lora" > "${lora%.safetensors}.evaluation.json"
done
studio b4m evaluate assets/b4m/cross-content.safetensors assets/b4m/sepia-style.safetensors > assets/b4m/evaluation.json
studio b4m evaluate assets/b4m/cross-content.safetensors assets/b4m/sepia-style.safetensors --assembled assets/b4m/cross-sepia-made.safetensors > assets/b4m/evaluation-made.json
