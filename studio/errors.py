"""User-facing errors: one sentence naming the thing and the problem, never a traceback."""


class StudioError(Exception):
    """An error whose message is a complete sentence a designer can act on."""


class ModelNotAvailable(StudioError):
    pass


class LoraError(StudioError):
    pass


class PresetError(StudioError):
    pass


class Cancelled(StudioError):
    pass
