"""Exceptions raised when an offline asset is unknown or not installed."""


class AssetError(Exception):
    """Base class of the errors raised by `hf_dp_microadam.assets`."""


class MissingAssetError(AssetError, FileNotFoundError):
    """An offline asset, or a package needed to load it, is not installed.

    The message names the asset, the missing files or packages, and the command that
    installs them.
    """


class UnknownAssetError(AssetError, ValueError, OSError):
    """A name is not one of the offline names, and could not be loaded as a hub id or path.

    It subclasses OSError as well, the type that `from_pretrained` raises for a model it
    cannot find, so that code catching that error keeps working.
    """
