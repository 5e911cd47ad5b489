"""User-facing error codes, each with a one-line meaning.

Codes that Power Automate documents keep its names, so that operators can look them up.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a run was rejected, failed, timed out, or cannot be placed on a machine."""

    # Admission (the run is rejected).
    InvalidRunRequest = "InvalidRunRequest"
    ConnectionNotFound = "ConnectionNotFound"
    ConnectionAccessDenied = "ConnectionAccessDenied"
    UnattendedUnsupportedForConnectWithSignIn = "UnattendedUnsupportedForConnectWithSignIn"
    TenantMismatchForConnectWithSignIn = "TenantMismatchForConnectWithSignIn"
    MachineNotFound = "MachineNotFound"
    MachineGroupNotFound = "MachineGroupNotFound"
    GroupIsEmpty = "GroupIsEmpty"
    UnallowedTenantForConnectWithSignIn = "UnallowedTenantForConnectWithSignIn"
    DesktopFlowsActionThrottled = "DesktopFlowsActionThrottled"
    QueueFull = "QueueFull"

    # Why a machine cannot take a run right now (the run keeps waiting).
    MachineOffline = "MachineOffline"
    MachineInMaintenance = "MachineInMaintenance"
    NoFreeSlot = "NoFreeSlot"
    AttendedUserSessionNotActive = "AttendedUserSessionNotActive"
    AttendedUserNotLoggedIn = "AttendedUserNotLoggedIn"
    NoSessionFoundForPasswordless = "NoSessionFoundForPasswordless"
    SessionExistsForTheUserWhenUnattended = "SessionExistsForTheUserWhenUnattended"
    UnattendedUserSessionLocked = "UnattendedUserSessionLocked"
    UnattendedUserSessionDisconnected = "UnattendedUserSessionDisconnected"
    Win10AlreadyHasActiveSession = "Win10AlreadyHasActiveSession"
    UserRunInProgress = "UserRunInProgress"
    NoWorkerKey = "NoWorkerKey"
    KeyMismatch = "KeyMismatch"

    # Terminal outcomes.
    NoCandidateMachine = "NoCandidateMachine"
    PredictedQueueTimeout = "PredictedQueueTimeout"
    DesktopFlowsActionTimeout = "DesktopFlowsActionTimeout"
    PasswordlessTokenExpiry = "PasswordlessTokenExpiry"
    IdentityProviderMisconfigured = "IdentityProviderMisconfigured"
    IdentityProviderUnavailable = "IdentityProviderUnavailable"
    SecretNotFound = "SecretNotFound"
    SecretAccessDenied = "SecretAccessDenied"
    VaultUnavailable = "VaultUnavailable"
    FlowFailed = "FlowFailed"
    ExecutorFailed = "ExecutorFailed"
    OutputsTooLarge = "OutputsTooLarge"
    MachineLost = "MachineLost"
    WorkerRestarted = "WorkerRestarted"
    WorkerStopped = "WorkerStopped"
    Cancelled = "Cancelled"

    @property
    def meaning(self) -> str:
        """One line that says what the code means, for CLI output and runbooks."""
        return MEANINGS[self]


MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.InvalidRunRequest: "the message is not a valid run request",
    ErrorCode.ConnectionNotFound: "no connection has this id",
    ErrorCode.ConnectionAccessDenied: "only the connection's owner may run flows with it",
    ErrorCode.UnattendedUnsupportedForConnectWithSignIn: (
        "connect-with-sign-in connections run attended only"
    ),
    ErrorCode.TenantMismatchForConnectWithSignIn: (
        "the sign-in account's tenant is not the environment's tenant"
    ),
    ErrorCode.MachineNotFound: "the connection's target machine does not exist",
    ErrorCode.MachineGroupNotFound: "the connection's target group does not exist",
    ErrorCode.GroupIsEmpty: "the target group has no machines",
    ErrorCode.UnallowedTenantForConnectWithSignIn: (
        "every machine of the target is AD-joined without the tenant in its allow-list"
    ),
    ErrorCode.DesktopFlowsActionThrottled: "too many runs per minute on this connection",
    ErrorCode.QueueFull: "the target's queue is full",
    ErrorCode.MachineOffline: "the machine's worker stopped sending heartbeats",
    ErrorCode.MachineInMaintenance: "the machine is in maintenance",
    ErrorCode.NoFreeSlot: "every unattended slot of the machine is busy",
    ErrorCode.AttendedUserSessionNotActive: "the user's session is locked or disconnected",
    ErrorCode.AttendedUserNotLoggedIn: "the user has no session on the machine",
    ErrorCode.NoSessionFoundForPasswordless: "the sign-in user has no session on the machine",
    ErrorCode.SessionExistsForTheUserWhenUnattended: (
        "an unattended run needs the user to have no session on the machine"
    ),
    ErrorCode.UnattendedUserSessionLocked: "the user has a locked session on the machine",
    ErrorCode.UnattendedUserSessionDisconnected: (
        "the user has a disconnected session on the machine"
    ),
    ErrorCode.Win10AlreadyHasActiveSession: (
        "a Windows client machine with another user's active session cannot run unattended"
    ),
    ErrorCode.UserRunInProgress: "a run of this user already occupies its session on the machine",
    ErrorCode.NoWorkerKey: "the machine's worker has not registered its public key yet",
    ErrorCode.KeyMismatch: (
        "a worker presented another key than the one pinned for the machine: register the "
        "machine again (machines register) to accept a new key"
    ),
    ErrorCode.NoCandidateMachine: (
        "the run's queue deadline passed before any machine could take it"
    ),
    ErrorCode.PredictedQueueTimeout: (
        "the run asked to fail early and the queue ahead certainly cannot clear before its deadline"
    ),
    ErrorCode.DesktopFlowsActionTimeout: "the run exceeded its run time limit",
    ErrorCode.PasswordlessTokenExpiry: (
        "the sign-in connection's tokens are expired or revoked: sign the connection in again"
    ),
    ErrorCode.IdentityProviderMisconfigured: (
        "the identity provider rejected the dispatcher's client registration"
    ),
    ErrorCode.IdentityProviderUnavailable: "the identity provider did not answer in time",
    ErrorCode.SecretNotFound: "the connection's secret does not exist in its vault",
    ErrorCode.SecretAccessDenied: "the vault refused access to the connection's secret",
    ErrorCode.VaultUnavailable: "the connection's vault did not answer",
    ErrorCode.FlowFailed: "the desktop flow reported a failure",
    ErrorCode.ExecutorFailed: "the machine could not run the flow (its executor raised an error)",
    ErrorCode.OutputsTooLarge: "the flow's outputs or error text exceed the size limit",
    ErrorCode.MachineLost: "the machine went offline while running the flow",
    ErrorCode.WorkerRestarted: "the worker restarted while the flow ran; it is not run again",
    ErrorCode.WorkerStopped: (
        "the worker was stopped (SIGTERM, service stop) and the flow outlasted its grace period"
    ),
    ErrorCode.Cancelled: "the run was cancelled",
}
