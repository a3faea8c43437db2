/*
 * kafka_mock.c - run librdkafka's in-process mock Kafka cluster as a
 * standalone process, for kafka_bridge tests that do not need a real
 * broker ("scripts/kafka start --embedded").
 *
 * The mock cluster speaks the Kafka protocol on 127.0.0.1 (ephemeral
 * ports) and supports produce, fetch, consumer groups, offset commits and
 * idempotent/transactional producers well enough for client testing.  It
 * keeps everything in memory: nothing survives a restart.
 *
 * Usage: kafka_mock [-b BROKERS] [-f FILE] [-t TOPIC[:PARTITIONS[:RF]]]...
 *                   [-d DEBUG]
 *
 *   -b N      number of mock brokers (default 1)
 *   -f FILE   also write the bootstrap servers to FILE (written atomically
 *             via FILE.tmp + rename, so a reader never sees a partial line)
 *   -t SPEC   create a topic up front.  Topics that are auto-created on
 *             first use get librdkafka's default of 4 partitions; use this
 *             to get a different partition count.  May be repeated.
 *   -d LIST   librdkafka debug contexts (e.g. "mock,protocol"), logged to
 *             stderr
 *
 * The bootstrap servers are printed as one line on stdout.  The process
 * then waits for SIGTERM, SIGINT or SIGHUP, destroys the cluster and exits
 * with status 0.
 *
 * SIGUSR1 takes all mock brokers down (connections are closed and refused),
 * SIGUSR2 brings them back up; handy for simulating an outage without
 * losing the in-memory data.
 *
 * Build: cc -O2 -Wall -Werror -o kafka_mock kafka_mock.c \
 *            $(pkg-config --cflags --libs rdkafka)
 */

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define MAX_TOPICS 64

static const char *progname = "kafka_mock";

static void
usage(FILE *out)
{
	fprintf(out,
			"Usage: %s [-b BROKERS] [-f FILE] [-t TOPIC[:PARTITIONS[:RF]]]... "
			"[-d DEBUG]\n"
			"Runs a librdkafka mock cluster until SIGTERM/SIGINT.\n",
			progname);
}

static int
parse_int(const char *s, const char *what, int min, int max)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
	{
		fprintf(stderr, "%s: invalid %s \"%s\" (expected %d..%d)\n",
				progname, what, s, min, max);
		exit(2);
	}
	return (int) v;
}

static int
write_file_atomically(const char *path, const char *line)
{
	char		tmp[PATH_MAX];
	FILE	   *f;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int) sizeof(tmp))
	{
		fprintf(stderr, "%s: path too long: %s\n", progname, path);
		return -1;
	}
	f = fopen(tmp, "w");
	if (f == NULL)
	{
		fprintf(stderr, "%s: cannot write %s: %s\n", progname, tmp,
				strerror(errno));
		return -1;
	}
	if (fprintf(f, "%s\n", line) < 0 || fclose(f) != 0)
	{
		fprintf(stderr, "%s: cannot write %s: %s\n", progname, tmp,
				strerror(errno));
		unlink(tmp);
		return -1;
	}
	if (rename(tmp, path) != 0)
	{
		fprintf(stderr, "%s: cannot rename %s to %s: %s\n", progname, tmp,
				path, strerror(errno));
		unlink(tmp);
		return -1;
	}
	return 0;
}

static void
set_all_brokers(rd_kafka_mock_cluster_t *mcluster, int broker_cnt, int up)
{
	int			id;

	/* Mock broker ids are 1..broker_cnt. */
	for (id = 1; id <= broker_cnt; id++)
	{
		rd_kafka_resp_err_t err;

		err = up ? rd_kafka_mock_broker_set_up(mcluster, id)
			: rd_kafka_mock_broker_set_down(mcluster, id);
		if (err)
			fprintf(stderr, "%s: setting broker %d %s failed: %s\n",
					progname, id, up ? "up" : "down", rd_kafka_err2str(err));
	}
	fprintf(stderr, "%s: all brokers %s\n", progname, up ? "up" : "down");
}

int
main(int argc, char **argv)
{
	int			broker_cnt = 1;
	const char *bootstrap_file = NULL;
	const char *debug = NULL;
	char	   *topics[MAX_TOPICS];
	int			ntopics = 0;
	int			opt;
	int			i;
	sigset_t	sigs;
	char		errstr[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_mock_cluster_t *mcluster;
	const char *bootstraps;

	if (argc > 0 && argv[0] != NULL)
	{
		const char *slash = strrchr(argv[0], '/');

		progname = slash ? slash + 1 : argv[0];
	}

	while ((opt = getopt(argc, argv, "b:f:t:d:h")) != -1)
	{
		switch (opt)
		{
			case 'b':
				broker_cnt = parse_int(optarg, "broker count", 1, 64);
				break;
			case 'f':
				bootstrap_file = optarg;
				break;
			case 't':
				if (ntopics >= MAX_TOPICS)
				{
					fprintf(stderr, "%s: too many -t options (max %d)\n",
							progname, MAX_TOPICS);
					return 2;
				}
				topics[ntopics++] = optarg;
				break;
			case 'd':
				debug = optarg;
				break;
			case 'h':
				usage(stdout);
				return 0;
			default:
				usage(stderr);
				return 2;
		}
	}
	if (optind < argc)
	{
		fprintf(stderr, "%s: unexpected argument \"%s\"\n", progname,
				argv[optind]);
		usage(stderr);
		return 2;
	}

	/*
	 * Block the signals we wait for before librdkafka starts its threads,
	 * so that they inherit the mask and sigwait() below gets the signals.
	 */
	/*
	 * A shell starting us in the background may have set SIGINT/SIGQUIT
	 * to be ignored; ignored signals are discarded and never reach
	 * sigwait(), so restore the defaults first.
	 */
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	signal(SIGUSR1, SIG_DFL);
	signal(SIGUSR2, SIG_DFL);

	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigaddset(&sigs, SIGUSR1);
	sigaddset(&sigs, SIGUSR2);
	if (pthread_sigmask(SIG_BLOCK, &sigs, NULL) != 0)
	{
		fprintf(stderr, "%s: pthread_sigmask failed\n", progname);
		return 1;
	}
	/* A closed stdout must not kill us later. */
	signal(SIGPIPE, SIG_IGN);

	/*
	 * The mock cluster needs a client handle to live in; it owns the
	 * cluster's threads.  This handle never connects anywhere itself.
	 */
	conf = rd_kafka_conf_new();
	if (debug != NULL &&
		rd_kafka_conf_set(conf, "debug", debug, errstr, sizeof(errstr)) !=
		RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "%s: %s\n", progname, errstr);
		rd_kafka_conf_destroy(conf);
		return 2;
	}
	/*
	 * Without debugging, only warnings and worse: the handle has no
	 * bootstrap.servers on purpose and would otherwise log a notice.
	 */
	if (debug == NULL &&
		rd_kafka_conf_set(conf, "log_level", "4", errstr, sizeof(errstr)) !=
		RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "%s: %s\n", progname, errstr);
		rd_kafka_conf_destroy(conf);
		return 1;
	}
	if (rd_kafka_conf_set(conf, "client.id", "kafka_mock", errstr,
						  sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "%s: %s\n", progname, errstr);
		rd_kafka_conf_destroy(conf);
		return 1;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "%s: rd_kafka_new failed: %s\n", progname, errstr);
		return 1;
	}

	mcluster = rd_kafka_mock_cluster_new(rk, broker_cnt);
	if (mcluster == NULL)
	{
		fprintf(stderr, "%s: rd_kafka_mock_cluster_new(%d) failed\n",
				progname, broker_cnt);
		rd_kafka_destroy(rk);
		return 1;
	}

	for (i = 0; i < ntopics; i++)
	{
		char	   *name = topics[i];
		char	   *colon = strchr(name, ':');
		int			partitions = 1;
		int			rf = broker_cnt < 3 ? broker_cnt : 3;
		rd_kafka_resp_err_t err;

		if (colon != NULL)
		{
			char	   *colon2;

			*colon++ = '\0';
			colon2 = strchr(colon, ':');
			if (colon2 != NULL)
			{
				*colon2++ = '\0';
				rf = parse_int(colon2, "replication factor", 1, broker_cnt);
			}
			partitions = parse_int(colon, "partition count", 1, 10000);
		}
		if (*name == '\0')
		{
			fprintf(stderr, "%s: empty topic name in -t\n", progname);
			rd_kafka_mock_cluster_destroy(mcluster);
			rd_kafka_destroy(rk);
			return 2;
		}
		err = rd_kafka_mock_topic_create(mcluster, name, partitions, rf);
		if (err)
		{
			fprintf(stderr, "%s: creating topic %s failed: %s\n", progname,
					name, rd_kafka_err2str(err));
			rd_kafka_mock_cluster_destroy(mcluster);
			rd_kafka_destroy(rk);
			return 1;
		}
	}

	bootstraps = rd_kafka_mock_cluster_bootstraps(mcluster);
	if (bootstrap_file != NULL &&
		write_file_atomically(bootstrap_file, bootstraps) != 0)
	{
		rd_kafka_mock_cluster_destroy(mcluster);
		rd_kafka_destroy(rk);
		return 1;
	}
	printf("%s\n", bootstraps);
	fflush(stdout);

	for (;;)
	{
		int			sig;

		if (sigwait(&sigs, &sig) != 0)
			continue;
		if (sig == SIGUSR1)
			set_all_brokers(mcluster, broker_cnt, 0);
		else if (sig == SIGUSR2)
			set_all_brokers(mcluster, broker_cnt, 1);
		else
		{
			fprintf(stderr, "%s: got signal %d, shutting down\n", progname,
					sig);
			break;
		}
	}

	rd_kafka_mock_cluster_destroy(mcluster);
	rd_kafka_destroy(rk);
	if (bootstrap_file != NULL)
		unlink(bootstrap_file);
	return 0;
}
