# scripts/demo, the quick start the README gives, runs to its end: two
# instances kept in sync through librdkafka's mock cluster, converging after
# each step of its story.  The demo starts its own cluster and instances.
use strict;
use warnings;

use File::Basename qw(dirname);
use Test::More;
use KafkaBridgeTest;

# the tree under test: scripts/kafka's
my $repo = dirname(dirname($ENV{KB_KAFKA_SCRIPT} // die "KB_KAFKA_SCRIPT is not set"));

my $out = `timeout 600 "$repo/scripts/demo" 2>&1`;
my $rc = $? >> 8;
is($rc, 0, 'scripts/demo exits with status 0')
  or diag(join("\n", (split /\n/, $out)[-40 .. -1]));
like($out, qr/^Demo passed: A and B converged at every step\.$/m, 'scripts/demo says both instances converged');
unlike($out, qr/cannot create topic/, 'no topic creation error on the way');

done_testing();
