"""DICOMweb adapter (PS3.18): STOW-RS, QIDO-RS, WADO-RS and delete on aiohttp."""
