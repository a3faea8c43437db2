# test/lib/KafkaBridgeTest.pm - helpers shared by the TAP tests: PostgreSQL
# nodes configured for kafka_bridge, and control of the real Kafka broker
# that scripts/test started with scripts/kafka.
package KafkaBridgeTest;

use strict;
use warnings;

use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep time);

our @EXPORT = qw(kb_node kafka_bootstrap kafka_port kafka_stop kafka_start
  kb_wait_state kb_status kafka_records kafka_wait_records kb_wait_slot);

sub _env
{
	my ($name) = @_;
	return $ENV{$name}
	  // BAIL_OUT("$name is not set: run the TAP tests with scripts/test tap");
}

sub kafka_bootstrap { return _env('KB_KAFKA_BOOTSTRAP'); }
sub kafka_port      { return _env('KB_KAFKA_PORT'); }

# Stop the broker, keeping its data (an outage, not a wipe).
sub kafka_stop
{
	my $script = _env('KB_KAFKA_SCRIPT');
	system($script, 'stop') == 0 or die "scripts/kafka stop failed";
	note "Kafka broker stopped";
}

# Freeze the broker (SIGSTOP) or let it go on (SIGCONT): its connections
# stay open, so requests sent meanwhile get no answer.
sub kafka_pause  { _kafka_signal('STOP'); return; }
sub kafka_resume { _kafka_signal('CONT'); return; }

sub _kafka_signal
{
	my ($signal) = @_;
	my $file = _env('KAFKA_BRIDGE_KAFKA_DIR') . '/broker-1/pid';
	open(my $fh, '<', $file) or die "cannot read $file: $!";
	chomp(my $pid = <$fh>);
	close $fh;
	kill($signal, $pid) == 1 or die "cannot send SIG$signal to the broker ($pid): $!";
	note "Kafka broker: SIG$signal";
	return;
}

# Start the broker again on the same data and port.
sub kafka_start
{
	my $script = _env('KB_KAFKA_SCRIPT');
	my $out = `$script start --port @{[kafka_port()]}`;
	die "scripts/kafka start failed" if $? != 0;
	note "Kafka broker started again: $out";
}

# A node whose kafka_bridge workers serve database "postgres" and talks to
# the real broker.  %opts: preload => 0 to leave shared_preload_libraries
# unset; conf => extra postgresql.conf lines.
sub kb_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	my $bootstrap = kafka_bootstrap();
	my $preload = ($opts{preload} // 1) ? 'kafka_bridge' : '';

	$node->init(allows_streaming => 'logical');
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = '$preload'
wal_level = logical
max_worker_processes = 16
track_commit_timestamp = on
restart_after_crash = on
output_plugin_libraries = 'pgoutput, test_decoding, kafka_bridge'
kafka_bridge.bootstrap_servers = '$bootstrap'
kafka_bridge.databases = 'postgres'
kafka_bridge.instance_id = '$name'
kafka_bridge.worker_restart_delay = 1s
kafka_bridge.probe_interval = 1s
} . ($opts{conf} // ''));
	return $node;
}

# Row of kafka_bridge.status for a database's worker (by default its
# publisher), as a hash.
sub kb_status
{
	my ($node, $dbname, $worker) = @_;
	$dbname //= 'postgres';
	$worker //= 'publisher';
	my $row = $node->safe_psql('postgres',
		"SELECT coalesce(pid, 0), state, coalesce(brokers, ''), coalesce(last_error, '') "
		  . "FROM kafka_bridge.status WHERE database = '$dbname' AND worker = '$worker'");
	my ($pid, $state, $brokers, $error) = split /\|/, $row, 4;
	return { pid => $pid, state => $state, brokers => $brokers, last_error => $error };
}

# Wait until a worker of a database (by default its publisher) reports a
# state; returns true if so.
sub kb_wait_state
{
	my ($node, $state, $dbname, $worker) = @_;
	$dbname //= 'postgres';
	$worker //= 'publisher';
	return $node->poll_query_until('postgres',
		"SELECT state = '$state' FROM kafka_bridge.status WHERE database = '$dbname' AND worker = '$worker'");
}

# Every record of a topic, from the beginning, read with kcat from the real
# broker: a list of { key, value, headers => { name => value }, partition,
# offset }.  An empty list when the topic does not exist (yet).
sub kafka_records
{
	my ($topic) = @_;
	my $bootstrap = kafka_bootstrap();
	my @out = `kcat -C -b '$bootstrap' -t '$topic' -o beginning -e -q -J 2>/dev/null`;
	my $json = JSON::PP->new->utf8(0);
	my @records;
	for my $line (@out)
	{
		chomp $line;
		next unless $line =~ /^\{/;
		my $r = $json->decode($line);
		my %h = @{ $r->{headers} // [] };
		push @records,
		  {
			key       => $r->{key},
			value     => $r->{payload},
			headers   => \%h,
			partition => $r->{partition},
			offset    => $r->{offset}
		  };
	}
	return @records;
}

# Wait (up to $timeout seconds, default 120) until the topic holds at least
# $count records; returns them.
sub kafka_wait_records
{
	my ($topic, $count, $timeout) = @_;
	$timeout //= 120;
	my @records;
	# by the clock: reading a topic with kcat takes a good part of a second
	my $deadline = time() + $timeout;
	while (1)
	{
		@records = kafka_records($topic);
		return @records if @records >= $count;
		last if time() >= $deadline;
		usleep(100_000);
	}
	diag("topic $topic holds " . scalar(@records) . " records, expected $count");
	return @records;
}

# Wait until the worker has created the database's replication slot.
sub kb_wait_slot
{
	my ($node, $dbname) = @_;
	$dbname //= 'postgres';
	return $node->poll_query_until($dbname,
		"SELECT count(*) = 1 FROM pg_replication_slots WHERE slot_name = 'kafka_bridge_' || "
		  . "(SELECT oid FROM pg_database WHERE datname = current_database())");
}


# ---- Helpers of the apply tests (03*.pl): writing records with kcat ----

push @EXPORT, qw(kafka_produce kb_md5 kb_applier kafka_create_topic kafka_alter_topic
  kafka_delete_records kafka_pause kafka_resume);

# Write records to a topic with kcat, in order: a list of { key, value,
# headers => [ name => value, ... ], partition (default 0) }.  An undefined
# key or value is sent as null, an empty string as an empty one; the bytes
# are sent as they are (no encoding, newlines and tabs allowed).  Records
# that share their headers and partition go in one kcat run, so thousands
# of records take seconds.
sub kafka_produce
{
	my ($topic, @records) = @_;
	my $bootstrap = kafka_bootstrap();
	while (@records)
	{
		# the longest run of records kcat can write with the same options
		my $first = $records[0];
		my $opts = _kafka_produce_opts($first);
		my $n = 1;
		$n++ while $n < @records && _kafka_produce_opts($records[$n]) eq $opts;
		my @batch = splice(@records, 0, $n);

		my $input = '';
		for my $r (@batch)
		{
			for my $part ($r->{key}, $r->{value})
			{
				next unless defined $part;
				die "kafka_produce: bytes 0x01 and 0x02 separate records, they cannot be sent"
				  if $part =~ /[\x01\x02]/;
			}
			$input .= ($r->{key} // '') . "\x02" . ($r->{value} // '') . "\x01";
		}
		my @cmd = ('kcat', '-P', '-b', $bootstrap, '-t', $topic,
			'-p', $first->{partition} // 0, '-D', '\x01', '-K', '\x02');
		# with -Z, kcat sends an empty key or value as null
		push @cmd, '-Z' if !defined $first->{key} || !defined $first->{value};
		my @h = @{ $first->{headers} // [] };
		while (my ($name, $value) = splice(@h, 0, 2))
		{
			push @cmd, '-H', "$name=$value";
		}
		open(my $kcat, '|-', @cmd) or die "cannot run kcat: $!";
		binmode $kcat;
		print $kcat $input;
		close($kcat) or die "kcat failed writing to topic $topic: exit status $?";
	}
	return;
}

# The kcat options a record needs besides its key and value.
sub _kafka_produce_opts
{
	my ($r) = @_;
	my $null = !defined $r->{key} || !defined $r->{value};
	my $empty = (defined $r->{key} && $r->{key} eq '') || (defined $r->{value} && $r->{value} eq '');
	die "kafka_produce: kcat cannot send a record with a null and an empty part" if $null && $empty;
	return join("\x00", $r->{partition} // 0, $null ? 'null' : '', @{ $r->{headers} // [] });
}

# md5 of a table's rows in key order: two tables with the same rows have
# the same md5.
sub kb_md5
{
	my ($node, $table, $order) = @_;
	$order //= 'id';
	return $node->safe_psql('postgres',
		"SELECT count(*) || ':' || coalesce(md5(string_agg(kb_row::text, ',' ORDER BY $order)), '') FROM $table kb_row");
}

# Run one of Kafka's own command-line tools (a Java class) from the jars
# scripts/kafka fetched, against the broker; dies with its output if it
# fails.
sub _kafka_tool
{
	my ($what, $class, $args) = @_;
	my $cache = _env('KAFKA_BRIDGE_CACHE');
	my ($libs) = glob("$cache/kafka-*/libs");
	die "no Kafka jars under $cache" unless $libs;
	my $out = `java -cp '$libs/*' $class --bootstrap-server @{[kafka_bootstrap()]} $args 2>&1`;
	die "cannot $what: $out" if $? != 0;
	return;
}

# Create a topic with a number of partitions (and a topic setting such as
# 'max.message.bytes=512', if given), with Kafka's own TopicCommand.
sub kafka_create_topic
{
	my ($topic, $partitions, $config) = @_;
	my $extra = defined $config ? "--config '$config'" : '';
	_kafka_tool("create topic $topic", 'org.apache.kafka.tools.TopicCommand',
		"--create --topic '$topic' --partitions $partitions --replication-factor 1 $extra");
	note "created topic $topic with $partitions partitions";
	return;
}

# Change a setting of a topic ('max.message.bytes=1000000'), with Kafka's
# own ConfigCommand.
sub kafka_alter_topic
{
	my ($topic, $config) = @_;
	_kafka_tool("alter topic $topic", 'kafka.admin.ConfigCommand',
		"--alter --entity-type topics --entity-name '$topic' --add-config '$config'");
	note "topic $topic: $config";
	return;
}

# Delete the records of a partition below an offset, as retention would,
# with Kafka's own DeleteRecordsCommand: the partition then starts there.
sub kafka_delete_records
{
	my ($topic, $partition, $before) = @_;
	my $file = PostgreSQL::Test::Utils::tempdir() . '/delete-records.json';
	open(my $fh, '>', $file) or die "cannot write $file: $!";
	print $fh qq({"version":1,"partitions":[{"topic":"$topic","partition":$partition,"offset":$before}]});
	close $fh;
	_kafka_tool("delete records of topic $topic", 'org.apache.kafka.tools.DeleteRecordsCommand',
		"--offset-json-file '$file'");
	note "topic $topic partition $partition: records below offset $before deleted";
	return;
}

# The applier's row of kafka_bridge.status, as a hash (pid 0 when it has none).
sub kb_applier
{
	my ($node, $dbname) = @_;
	$dbname //= 'postgres';
	my $row = $node->safe_psql('postgres',
		"SELECT coalesce(pid, 0), state, coalesce(events_applied, 0), coalesce(consumer_lag, 0), "
		  . "coalesce(last_error, '') FROM kafka_bridge.status "
		  . "WHERE database = '$dbname' AND worker = 'applier'");
	my ($pid, $state, $applied, $lag, $error) = split /\|/, $row, 5;
	return { pid => $pid // 0, state => $state // '', events_applied => $applied // 0,
		consumer_lag => $lag // 0, last_error => $error // '' };
}


# ---- Helpers of the snapshot tests (04*.pl): large topics, read fast ----

push @EXPORT, qw(kafka_scan kb_converge);

# Wait (up to two minutes) until two nodes hold the same rows in a table
# (kb_md5); one test assertion, with both workers' status when it fails.
sub kb_converge
{
	my ($x, $y, $table, $what) = @_;
	my ($mx, $my) = ('', '');
	my $deadline = time() + 120;
	while (1)
	{
		$mx = kb_md5($x, $table);
		$my = kb_md5($y, $table);
		return ok(1, $what) if $mx eq $my;
		last if time() >= $deadline;
		usleep(100_000);
	}
	diag("$mx vs $my");
	for my $n ($x, $y)
	{
		diag($n->name . ': ' . $n->safe_psql('postgres', 'SELECT worker, state, activity, last_error FROM kafka_bridge.status'));
		diag($n->name . ': ' . $n->safe_psql('postgres', 'SELECT * FROM kafka_bridge.subscription_status'));
	}
	return ok(0, $what);
}

# Every record of a topic, like kafka_records but without decoding JSON,
# for topics of hundreds of thousands of records: a list of { partition,
# offset, key, value (undef for a null value), headers => { name => value } }.
# Keys, values and header values must hold no tab or newline (JSON does not).
sub kafka_scan
{
	my ($topic) = @_;
	my $bootstrap = kafka_bootstrap();
	my @records;
	open(my $kcat, '-|', 'kcat', '-C', '-b', $bootstrap, '-t', $topic, '-o', 'beginning', '-e', '-q',
		'-Z', '-f', "%p\t%o\t%K\t%k\t%S\t%h\t%s\n") or die "cannot run kcat: $!";
	while (my $line = <$kcat>)
	{
		chomp $line;
		my ($p, $o, $klen, $key, $vlen, $h, $value) = split /\t/, $line, 7;
		my %headers = map { split /=/, $_, 2 } grep { length } split /,/, ($h // '');
		push @records, { partition => $p, offset => $o, key => $klen < 0 ? undef : $key,
			value => $vlen < 0 ? undef : $value, headers => \%headers };
	}
	close $kcat;
	return @records;
}

1;
