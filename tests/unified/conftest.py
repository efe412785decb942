import pytest


class Killed(Exception):
    """Raised in place of a step's batch: the run dies as a killed process would, after its last checkpoint."""


@pytest.fixture
def train_until_killed():
    """train_until_killed(config, step): train a UnifiedTask that dies when it asks for `step`'s batch."""
    from ernielab.unified.train import UnifiedTask

    class Interrupted(UnifiedTask):
        def batch(self, step, micro):
            if step == self.kill_at:
                raise Killed
            return super().batch(step, micro)

    def run(config, step: int) -> None:
        task = Interrupted(config)
        task.kill_at = step
        with pytest.raises(Killed):
            task.train()

    return run
