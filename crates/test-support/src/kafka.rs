//! librdkafka's mock cluster (the real Kafka protocol over TCP, in this process) with the one
//! control rdkafka's safe API lacks: a broker that answers one kind of request late, as a real
//! broker slow at one thing (tansu reading its storage after a restart) does, and a record of
//! the requests the brokers received.

use std::os::raw::c_int;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::RDKafkaApiKey;

/// A mock cluster owned by a client (`test.mock.num.brokers`), so that its raw handle can be
/// reached; dropped with it.
pub struct MockKafka {
    owner: BaseProducer,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap_servers())
            .finish()
    }
}

impl MockKafka {
    /// A cluster of `brokers` brokers (ids 1..=brokers).
    pub fn new(brokers: usize) -> Self {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .expect("mock cluster");
        Self { owner }
    }

    /// rdkafka's safe handle on the cluster (topics, broker up/down, ...).
    pub fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.owner.client().mock_cluster().expect("a mock cluster")
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// The next `count` requests of kind `api` that broker `broker` receives, on any
    /// connection, are answered correctly but `delay` late. A broker answers a connection's
    /// requests in order, and so does the mock: whatever follows a late answer on the same
    /// connection waits for it.
    pub fn answer_late(&self, broker: i32, api: RDKafkaApiKey, count: usize, delay: Duration) {
        let rtt_ms = c_int::try_from(delay.as_millis()).unwrap_or(c_int::MAX);
        for _ in 0..count {
            let err = self.raw(|m| {
                // SAFETY: `m` is the live cluster of `self.owner`; the variadic arguments are
                // `count` (here 1) pairs of (rd_kafka_resp_err_t, int rtt_ms), as documented
                // in rdkafka_mock.h.
                #[allow(unsafe_code)]
                unsafe {
                    rd::rd_kafka_mock_broker_push_request_error_rtts(
                        m,
                        broker,
                        i16::from(api),
                        1,
                        rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR as c_int,
                        rtt_ms,
                    )
                }
            });
            assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        }
    }

    /// How many of the late answers `answer_late` queued for `broker` and `api` are still to
    /// be used by a request.
    pub fn late_answers_left(&self, broker: i32, api: RDKafkaApiKey) -> usize {
        let mut n = 0usize;
        let err = self.raw(|m| {
            // SAFETY: `m` is the live cluster of `self.owner`; `n` outlives the call.
            #[allow(unsafe_code)]
            unsafe {
                rd::rd_kafka_mock_broker_error_stack_cnt(m, broker, i16::from(api), &mut n)
            }
        });
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        n
    }

    /// From now on the brokers record every request they receive (read with `requests`).
    pub fn track_requests(&self) {
        self.raw(|m| {
            // SAFETY: `m` is the live cluster of `self.owner`.
            #[allow(unsafe_code)]
            unsafe {
                rd::rd_kafka_mock_start_request_tracking(m)
            }
        });
    }

    /// The API keys of the requests received since `track_requests`, in the order the
    /// brokers received them.
    pub fn requests(&self) -> Vec<i16> {
        self.raw(|m| {
            let mut n = 0usize;
            // SAFETY: `m` is the live cluster of `self.owner`; librdkafka returns an array
            // of `n` request pointers that we own and free with its destroy function after
            // reading each one's API key.
            #[allow(unsafe_code)]
            unsafe {
                let reqs = rd::rd_kafka_mock_get_requests(m, &mut n);
                if reqs.is_null() {
                    return Vec::new();
                }
                let keys = std::slice::from_raw_parts(reqs, n)
                    .iter()
                    .map(|&r| rd::rd_kafka_mock_request_api_key(r))
                    .collect();
                rd::rd_kafka_mock_request_destroy_array(reqs, n);
                keys
            }
        })
    }

    fn raw<T>(&self, f: impl FnOnce(*mut rd::rd_kafka_mock_cluster_t) -> T) -> T {
        // SAFETY: the client is alive for the borrow of `self`; librdkafka returns its mock
        // cluster (or null, checked below), which lives as long as the client.
        #[allow(unsafe_code)]
        let m = unsafe { rd::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr()) };
        assert!(!m.is_null(), "the client owns a mock cluster");
        f(m)
    }
}
