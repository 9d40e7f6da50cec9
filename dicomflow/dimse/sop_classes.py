"""Presentation contexts the SCP accepts (PS3.8 7.1.1.13, PS3.7 D.3.3.2 role selection).

The storage SOP classes are every Storage SOP Class pynetdicom knows (PS3.4 Annex B.5); the
classes named in :data:`REQUIRED_STORAGE_SOP_CLASSES` are the ones the product promises and a
test keeps them in. Every listed transfer syntax is accepted and the data set is stored exactly
as received: nothing is transcoded on ingest.
"""

from __future__ import annotations

from typing import Any

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom import sop_class as _sop_class
from pynetdicom.ae import ApplicationEntity

#: pynetdicom builds its SOP Class constants at import time, so mypy cannot see them.
sc: Any = _sop_class

#: PS3.5 Section 10 / Annex A: every transfer syntax we accept for storage, stored as received.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,  # retired, still sent by old modalities
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEG2000MCLossless,
    uid.JPEG2000MC,
    uid.RLELossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.MPEG2MPML,
    uid.MPEG2MPMLF,
    uid.MPEG2MPHL,
    uid.MPEG2MPHLF,
    uid.MPEG4HP41,
    uid.MPEG4HP41F,
    uid.MPEG4HP41BD,
    uid.MPEG4HP41BDF,
    uid.MPEG4HP422D,
    uid.MPEG4HP422DF,
    uid.MPEG4HP423D,
    uid.MPEG4HP423DF,
    uid.MPEG4HP42STEREO,
    uid.MPEG4HP42STEREOF,
    uid.HEVCMP51,
    uid.HEVCM10P51,
)

#: Uncompressed syntaxes for non-storage services (verification, commitment, query/retrieve).
BASIC_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
)

#: The storage SOP classes issue 3 promises, by domain (PS3.4 B.5 Table B.5-1).
REQUIRED_STORAGE_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "general radiology": (
        sc.ComputedRadiographyImageStorage, sc.CTImageStorage, sc.EnhancedCTImageStorage,
        sc.MRImageStorage, sc.EnhancedMRImageStorage, sc.NuclearMedicineImageStorage,
        sc.PositronEmissionTomographyImageStorage, sc.EnhancedPETImageStorage, sc.UltrasoundImageStorage,
        sc.UltrasoundMultiFrameImageStorage, sc.XRayAngiographicImageStorage,
        sc.XRayRadiofluoroscopicImageStorage, sc.DigitalXRayImageStorageForPresentation,
        sc.DigitalXRayImageStorageForProcessing, sc.SecondaryCaptureImageStorage,
        sc.MultiFrameTrueColorSecondaryCaptureImageStorage, sc.BasicTextSRStorage, sc.EnhancedSRStorage,
        sc.ComprehensiveSRStorage, sc.Comprehensive3DSRStorage, sc.KeyObjectSelectionDocumentStorage,
        sc.GrayscaleSoftcopyPresentationStateStorage, sc.ColorSoftcopyPresentationStateStorage,
        sc.SegmentationStorage, sc.XRayRadiationDoseSRStorage, sc.EncapsulatedPDFStorage,
    ),
    "mammography": (
        sc.DigitalMammographyXRayImageStorageForPresentation,
        sc.DigitalMammographyXRayImageStorageForProcessing, sc.BreastTomosynthesisImageStorage,
        sc.BreastProjectionXRayImageStorageForPresentation, sc.BreastProjectionXRayImageStorageForProcessing,
        sc.MammographyCADSRStorage,
    ),
    "cardiology": (
        sc.XRayAngiographicImageStorage, sc.EnhancedXAImageStorage,
        sc.IntravascularOpticalCoherenceTomographyImageStorageForPresentation,
        sc.IntravascularOpticalCoherenceTomographyImageStorageForProcessing,
        sc.TwelveLeadECGWaveformStorage, sc.GeneralECGWaveformStorage, sc.AmbulatoryECGWaveformStorage,
        sc.HemodynamicWaveformStorage, sc.CardiacElectrophysiologyWaveformStorage,
        sc.ArterialPulseWaveformStorage, sc.RespiratoryWaveformStorage, sc.EnhancedUSVolumeStorage,
        sc.SimplifiedAdultEchoSRStorage,
    ),
    "oncology": (
        sc.RTImageStorage, sc.RTDoseStorage, sc.RTStructureSetStorage, sc.RTPlanStorage,
        sc.RTBeamsTreatmentRecordStorage, sc.RTBrachyTreatmentRecordStorage, sc.RTTreatmentSummaryRecordStorage,
        sc.RTIonPlanStorage, sc.RTIonBeamsTreatmentRecordStorage,
    ),
    "ophthalmology": (
        sc.OphthalmicPhotography8BitImageStorage, sc.OphthalmicPhotography16BitImageStorage,
        sc.OphthalmicTomographyImageStorage, sc.OphthalmicThicknessMapStorage,
        sc.WideFieldOphthalmicPhotographyStereographicProjectionImageStorage,
        sc.WideFieldOphthalmicPhotography3DCoordinatesImageStorage,
        sc.OphthalmicOpticalCoherenceTomographyEnFaceImageStorage,
    ),
    "pathology": (sc.VLWholeSlideMicroscopyImageStorage,),
}


def storage_sop_classes() -> list[str]:
    """Every Storage SOP Class UID we accept, without duplicates, in a stable order."""
    seen: dict[str, None] = {}
    for cx in AllStoragePresentationContexts:
        seen[str(cx.abstract_syntax)] = None
    for group in REQUIRED_STORAGE_SOP_CLASSES.values():
        for sop in group:
            seen[str(sop)] = None
    return list(seen)


#: PS3.4 C.6: the Query/Retrieve information models served by dimse/qr.py.
QR_FIND_SOP_CLASSES: tuple[str, ...] = (
    sc.PatientRootQueryRetrieveInformationModelFind,
    sc.StudyRootQueryRetrieveInformationModelFind,
)
QR_MOVE_SOP_CLASSES: tuple[str, ...] = (
    sc.PatientRootQueryRetrieveInformationModelMove,
    sc.StudyRootQueryRetrieveInformationModelMove,
)
QR_GET_SOP_CLASSES: tuple[str, ...] = (
    sc.PatientRootQueryRetrieveInformationModelGet,
    sc.StudyRootQueryRetrieveInformationModelGet,
)


def add_scp_contexts(ae: ApplicationEntity) -> None:
    """Everything the SCP accepts: verification, storage, storage commitment, query/retrieve."""
    ae.add_supported_context(sc.Verification, list(BASIC_TRANSFER_SYNTAXES))
    # PS3.4 J.3: Storage Commitment Push Model, the N-EVENT-REPORT goes back on this context.
    ae.add_supported_context(sc.StorageCommitmentPushModel, list(BASIC_TRANSFER_SYNTAXES))
    for sop in (*QR_FIND_SOP_CLASSES, *QR_MOVE_SOP_CLASSES, *QR_GET_SOP_CLASSES):
        ae.add_supported_context(sop, list(BASIC_TRANSFER_SYNTAXES))
    for sop in storage_sop_classes():
        # PS3.7 D.3.3.4 / PS3.4 C.4.3.1: scu_role and scp_role both allowed, so a C-GET requestor may
        # take the Storage SCP role on this association while ordinary peers stay Storage SCUs.
        ae.add_supported_context(sop, list(STORAGE_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
