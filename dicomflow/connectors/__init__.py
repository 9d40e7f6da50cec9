"""Actions of routes: FHIR upsert, DICOMweb STOW-RS forward, C-STORE forward, webhook."""
