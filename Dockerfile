# GPU image: NGC PyTorch carries CUDA torch, apex and Transformer Engine, which megatron-core
# uses when importable (training.bf16: true; with pruning, model.transformer_impl_after_pruning:
# transformer_engine, without it model.transformer_impl: transformer_engine).
# Build: docker build -t efficientllm .   (not buildable on the CPU dev machines: no Docker engine)
# Check on one GPU: docker run --gpus 1 --entrypoint bench/gpu_check.sh efficientllm
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/efficientllm
COPY setup.py README.md ./
COPY efficientllm ./efficientllm
COPY megatron_patches ./megatron_patches
COPY launch ./launch
COPY bench ./bench
# Keep the image's CUDA torch: install our deps without letting pip replace torch.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "megatron-core==0.16.1" sentencepiece pyyaml psutil tqdm tensorboard matplotlib \
    "transformers==5.24.0" tokenizers safetensors gguf datasets
ENV OMP_NUM_THREADS=8
ENTRYPOINT ["efficientllm"]
