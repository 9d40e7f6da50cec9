"""dicomflow: a multi-tenant DICOM store (DICOMweb + DIMSE) and FHIR-centric routing engine."""

__version__ = "0.1.0"
