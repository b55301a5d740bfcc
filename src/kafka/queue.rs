//! One input topic-partition's own librdkafka queue, split off the consumer's queue and read
//! in batches by the partition's task.
//!
//! rust-rdkafka's `PartitionQueue::poll` hands out one message per call, each wrapped in an
//! event with its own reference count and a clock read (~0.3 µs per record here, as much as
//! the whole raw consumer's bookkeeping). `rd_kafka_consume_batch_queue` takes up to a batch
//! under one queue lock, which is what librdkafka offers applications that read fast. This is
//! the only `unsafe` code of the processor: every pointer it touches is owned by a [`Batch`]
//! (messages, destroyed when the batch is cleared or dropped) or by a [`SplitQueue`] (the
//! queue handle, destroyed after its wake-up callback is disabled), and the queue holds the
//! consumer, so neither outlives librdkafka's handle.

use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::Notify;

use super::driver::Ctx;

/// An input topic-partition's queue: after [`SplitQueue::split`], librdkafka puts the
/// partition's records here instead of on the consumer's queue, through later assignments
/// and seeks too (an application's forwarding is not undone by a fetch start), and drops the
/// ones fetched before a seek by their version.
pub(super) struct SplitQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// The callback's argument, kept alive while the callback is enabled.
    _wake: Arc<Notify>,
    _consumer: Arc<BaseConsumer<Ctx>>,
}

// librdkafka's queues are thread-safe; the handle is only destroyed once, on drop.
unsafe impl Send for SplitQueue {}
unsafe impl Sync for SplitQueue {}

unsafe extern "C" fn wake_task(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` of the `SplitQueue` that enabled this callback, which
    // disables it before that `Notify` can be dropped.
    let wake = unsafe { &*(opaque as *const Notify) };
    wake.notify_one();
}

impl SplitQueue {
    /// Splits `topic`[`partition`] off the consumer's queue; `wake` is notified (from a
    /// librdkafka thread) whenever the queue goes from empty to non-empty. `None` when the
    /// topic name cannot be passed to librdkafka or it refuses the queue.
    pub(super) fn split(
        consumer: &Arc<BaseConsumer<Ctx>>,
        topic: &str,
        partition: i32,
        wake: Arc<Notify>,
    ) -> Option<SplitQueue> {
        let topic = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives; the returned queue is
        // ours to destroy.
        let queue = unsafe {
            rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), partition)
        };
        let queue = NonNull::new(queue)?;
        // SAFETY: `queue` is valid; forwarding to nothing stops it feeding the consumer's queue,
        // and the callback's argument lives in `self._wake` until `drop` disables it.
        unsafe {
            rd::rd_kafka_queue_forward(queue.as_ptr(), std::ptr::null_mut());
            rd::rd_kafka_queue_cb_event_enable(
                queue.as_ptr(),
                Some(wake_task),
                Arc::as_ptr(&wake) as *mut c_void,
            );
        }
        Some(SplitQueue { queue, _wake: wake, _consumer: Arc::clone(consumer) })
    }

    /// Takes up to `max` messages without waiting, appending them to `batch`; how many.
    pub(super) fn read(&self, batch: &mut Batch, max: usize) -> usize {
        let start = batch.messages.len();
        batch.messages.reserve(max);
        // SAFETY: the spare capacity holds `max` pointers; librdkafka writes at most `max` and
        // returns how many (or -1 on error, with nothing written).
        let n = unsafe {
            let spare = batch.messages.as_mut_ptr().add(start);
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, spare, max)
        };
        if n <= 0 {
            return 0;
        }
        let n = (n as usize).min(max);
        // SAFETY: librdkafka initialised `n` pointers past `start`; the batch owns them now.
        unsafe { batch.messages.set_len(start + n) };
        n
    }
}

impl Drop for SplitQueue {
    fn drop(&mut self) {
        // SAFETY: the callback is disabled before its argument (`self._wake`) can go, then the
        // handle is destroyed once.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// Messages taken from a [`SplitQueue`], owned until the batch is cleared or dropped.
#[derive(Default)]
pub(super) struct Batch {
    messages: Vec<*mut rd::rd_kafka_message_t>,
}

// Messages may be destroyed from any thread.
unsafe impl Send for Batch {}

impl Batch {
    pub(super) fn with_capacity(n: usize) -> Batch {
        Batch { messages: Vec::with_capacity(n) }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = Msg<'_>> {
        // SAFETY: every pointer came non-null from librdkafka and lives until `clear`.
        self.messages.iter().map(|m| Msg(unsafe { &**m }))
    }

    /// Destroys the messages.
    pub(super) fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: each message is destroyed once, here.
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A message of a [`Batch`].
#[derive(Clone, Copy)]
pub(super) struct Msg<'a>(&'a rd::rd_kafka_message_t);

impl<'a> Msg<'a> {
    /// librdkafka's error for this queue (an error event, not a record), if it is one.
    pub(super) fn error(&self) -> Option<KafkaError> {
        let err = self.0.err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| KafkaError::MessageConsumption(err.into()))
    }

    pub(super) fn offset(&self) -> i64 {
        self.0.offset
    }

    fn bytes(ptr: *mut c_void, len: usize) -> &'a [u8] {
        if ptr.is_null() || len == 0 {
            &[]
        } else {
            // SAFETY: librdkafka's buffer of `len` bytes, alive with the message.
            unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
        }
    }

    /// The payload (empty when there is none).
    pub(super) fn payload(&self) -> &'a [u8] {
        Self::bytes(self.0.payload, self.0.len)
    }

    /// The key (empty when there is none).
    pub(super) fn key(&self) -> &'a [u8] {
        Self::bytes(self.0.key, self.0.key_len)
    }

    /// The record's timestamp in ms, as rust-rdkafka's `Timestamp::to_millis` gives it.
    pub(super) fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message.
        let t = unsafe { rd::rd_kafka_message_timestamp(self.0, &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && t != -1).then_some(t)
    }

    /// The headers, copied (for dead letters; names that are not UTF-8 are replaced lossily).
    pub(super) fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: a live message; the headers belong to it.
        let err = unsafe { rd::rd_kafka_message_headers(self.0, &mut hdrs) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for idx in 0.. {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            // SAFETY: reads header `idx` of live headers; pointers stay valid with the message.
            let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: a NUL-terminated name owned by the headers.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
            out.push((name, Self::bytes(value as *mut c_void, size).to_vec()));
        }
        out
    }
}
