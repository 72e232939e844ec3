"""An imported (weights-only) checkpoint starts a run from its weights with or without
`checkpoint.finetune` (one mechanism: `checkpoint.start_from_weights`), and with the flag a
rerun resumes the run's own checkpoint instead of importing again."""

from __future__ import annotations

from efficientllm.config import Config
from efficientllm.interop.hf_import import import_hf
from efficientllm.training import checkpoint
from efficientllm.training.start import resolve_start


def test_an_imported_checkpoint_is_a_weights_start_and_a_finetunes_own_checkpoint_wins(tiny_llama_dir, single_rank, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    imported = import_hf(tiny_llama_dir, tmp_path / "imported")
    config = Config(run_dir=str(tmp_path / "run"))
    config.model.from_hf = str(tiny_llama_dir)
    config.checkpoint.load = str(imported)
    config.training.micro_batch_size = config.training.global_batch_size = 2
    trainer = Trainer(config, single_rank)  # model section filled from the HF config
    start = resolve_start(trainer.config, trainer.save_dir)
    assert start.checkpoint == checkpoint.iteration_dir(imported, 0) and start.weights_only

    trainer.config.checkpoint.finetune = True
    trainer.dp_rank, trainer.dp_size = 0, 1
    trainer.build_model(architecture_from_config(trainer.config, 512))
    checkpoint.start_from_weights(trainer, start.checkpoint)
    trainer.state.iteration = 1
    own = checkpoint.save(trainer, trainer.save_dir)
    again = resolve_start(trainer.config, trainer.save_dir)
    assert again.checkpoint == own and again.resumes
