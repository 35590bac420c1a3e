"""The durable checkpoint formats (R6.3) and the rules of recovering a checkpoint directory.

One source for what is on disk: the checkpoint file format (`checkpoint_file`), the WAL record
format and its scan (`wal_format`), what the log proves about each file and what recovery may
do (`recovery`), and a read-only report of a directory (`directory.inspect_directory`, behind
`tolaria checkpoints`). The sidecar's `WriteAheadLog` and `DurableStore` do the I/O; the
trainer reads files for `tolaria run --resume`. Nothing here writes a file or unpickles.

A checkpoint directory holds `ckpt-<sequence>-e<epoch>.bin` files, `ckpt-<sequence>.tmp`
files being written, `wal.log`, `wal.log.compact` while a new log is being written, and
`wal.log.damaged-<n>` copies of damaged logs. Opening it (the sidecar's `DurableStore`):

1. Scan `wal.log`. At a bad record, resynchronise on the next whole valid record (magic,
   header CRC32C, payload CRC32C, increasing sequence) and go on, so damage never hides the
   records after it. A whole record of another WAL version refuses the open instead.
2. Fold the valid records into transactions: BEGIN, then COMMIT (committed), ABORT (aborted)
   or RETIRE (retired); a BEGIN with none of them is in doubt. Files are matched by the name
   in their BEGIN or COMMIT.
3. Delete only what is PROVEN an uncommitted or dead write: `.tmp` files; `.bin` files whose
   transaction has an ABORT or RETIRE record (matched by name, or by the transaction id in the
   file's own verified header when the log lost the name); a `.bin` whose BEGIN has no
   COMMIT/ABORT when no damage follows that BEGIN in the log. A checkpoint or temp file with
   a higher sequence that no record describes counts as damage after the BEGIN: that file's
   own BEGIN was lost, so the log lost records even where no damaged byte shows (a log cut
   at a record boundary, a disk that dropped an acknowledged write). Nothing else is ever
   deleted.
4. A committed `.bin` stays listed and is verified against its record at every load.
5. A `.bin` the log does not describe (no record names it, or damage follows its BEGIN) is
   verified ALONE (`read_checkpoint_file`: header checksum, name, manifest, every data byte).
   If it verifies it is adopted as committed: a record built from its header and manifest
   (instance, lineage, training digest), `recovered_from_file=True`. If not, it is kept on
   disk, listed as damaged and never restored.
6. A torn tail (one damaged run at the end, no longer than a record, after valid records or
   looking like a first append) with nothing adopted or kept damaged is cut back to the last
   valid record. After any other damage (mid-log, garbage, a damaged run too long to be one
   append), a missing or empty log beside checkpoint files, a committed file gone missing,
   an adoption, or a damaged in-doubt file: the old log is linked aside as
   `wal.log.damaged-<n>` (the first free n; never overwritten) when it holds damage other
   than a torn tail, and a fresh compacted log of the live set (the log's commits whose file
   exists, plus the adopted files) is written to `wal.log.compact`, fsynced, renamed over
   `wal.log` and the directory fsynced. Later appends never follow damage. Files are deleted
   before the log is rewritten: a rewrite drops the ABORT and RETIRE records that prove them
   dead.
7. Sequences stay strictly increasing: the next record's sequence is above every sequence any
   valid record, COMPACTED marker, adopted commit or checkpoint file name uses.
8. Everything found is reported as a Leyline `WalRecovery` (damage at ERROR, a torn tail at
   WARNING). Every step is idempotent: a crash during recovery leaves a directory the next
   open recovers to the same live set.
"""

from leyline.durable.checkpoint_file import (
    CHUNK_BYTES,
    FILE_NAME,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    RECORD_VERSION,
    CheckpointFile,
    CheckpointFileInvalid,
    CheckpointHeader,
    Readable,
    check_against_record,
    check_data,
    check_file_name,
    check_manifest,
    checkpoint_files,
    decode_header,
    encode_header,
    file_name,
    hash_data,
    name_sequence,
    newest_valid_checkpoint,
    parse_manifest,
    read_checkpoint_file,
    read_exactly,
    record_from_file,
    temp_name,
    verify_stream,
)
from leyline.durable.directory import DirectoryReport, FileReport, NotADirectory, inspect_directory
from leyline.durable.recovery import (
    Action,
    Fate,
    FileFate,
    FilePlan,
    LogState,
    RecoveryOutcome,
    RecoveryPlan,
    Transaction,
    WalState,
    plan_recovery,
    settle,
)

__all__ = [
    "CHUNK_BYTES",
    "FILE_NAME",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "RECORD_VERSION",
    "Action",
    "CheckpointFile",
    "CheckpointFileInvalid",
    "CheckpointHeader",
    "DirectoryReport",
    "Fate",
    "FileFate",
    "FilePlan",
    "FileReport",
    "LogState",
    "NotADirectory",
    "Readable",
    "RecoveryOutcome",
    "RecoveryPlan",
    "Transaction",
    "WalState",
    "check_against_record",
    "check_data",
    "check_file_name",
    "check_manifest",
    "checkpoint_files",
    "decode_header",
    "encode_header",
    "file_name",
    "hash_data",
    "inspect_directory",
    "name_sequence",
    "newest_valid_checkpoint",
    "parse_manifest",
    "plan_recovery",
    "read_checkpoint_file",
    "read_exactly",
    "record_from_file",
    "settle",
    "temp_name",
    "verify_stream",
]
